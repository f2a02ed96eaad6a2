"""Attestations of a build: in-toto SLSA v1 provenance and a CycloneDX ML-BOM (statement),
DSSE signatures (dsse), and their place next to the image as OCI 1.1 referrers (referrers).

Import the submodules.
"""
