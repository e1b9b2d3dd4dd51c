//! pgoutput decoding (being written).
