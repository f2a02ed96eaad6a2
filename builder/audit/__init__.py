"""Audit: what shipped to whom, built from what, what changed, and whether it rebuilds.

Everything here reads only git and images: the customer repository's history and release
records, and an image's labels, in-image /app/config/provenance.json, layers and attached
attestations. ``history`` compares configurations in resolved terms, ``explain`` checks an
image against its records, ``verify`` rebuilds it, ``report`` renders the audit report. The
core never prints; the CLI renders these results. Import the submodules.
"""
