//! The change model and its encoders (being written).
