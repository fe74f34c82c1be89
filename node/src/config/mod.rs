//! Configuration room (being written).
