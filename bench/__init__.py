"""Benchmarks: each module's ``main()`` measures, prints a table and saves JSON."""
