//! libpq conninfo parsing (being written).
