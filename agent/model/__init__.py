"""The pipeline's vocabulary: what a device, a delivery, an outcome, a header and a site are.

Imports nothing else of ours (an import-linter contract holds it): every layer may use it.
"""
