//! The Kafka sink (being written).
