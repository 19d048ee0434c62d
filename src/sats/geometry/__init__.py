"""Geometry: the Volume and its axes, the left-right mirror, the symmetric grid, the
mid-sagittal plane (found in one place: :mod:`sats.geometry.preprocessing`), the
nasopharynx landmarks and the label-free asymmetry map."""
