"""Model plumbing: the architecture table, loading, canonicalisation and materialisation."""
