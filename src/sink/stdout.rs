//! The stdout sink (being written).
