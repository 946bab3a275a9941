"""What the service keeps in its data directory: named galleries (SQLite + FAISS), job records
with their leases, fitted heads and audit reports, each written atomically."""
