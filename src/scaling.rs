//! Scaling-law planner: Chinchilla (Hoffmann 2022, Besiroglu 2024 refit), Kaplan 2020 and the
//! inference-aware optimum (Sardana 2024). Pure functions, no I/O.
