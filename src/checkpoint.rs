//! Durable progress: snapshot state and LSN positions (being written).
