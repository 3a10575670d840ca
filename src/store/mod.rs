//! SQLite pool (WAL) and the migrations in migrations/.
