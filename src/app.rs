//! Application: binds the listener, loads the model, wires routes, runs until shutdown.
