"""The agent as its host's Prometheus exporter.

``registry`` holds the process's counters and histograms, which code
updates where things happen (plain Python, cheap on the hub); ``instances``
the host's instances as last read; ``collector`` turns those and the
components' own statistics into metric families at scrape time; ``server`` serves them from a
native thread, so a scrape builds its text off the hub and never calls
libvirt or the database.
"""
