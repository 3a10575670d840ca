//! Metric names (prefix `adapterd_`, units in the name), described once; recorder installed once.
