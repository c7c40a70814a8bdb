"""Console entry points. Each monkey-patches the standard library first."""
