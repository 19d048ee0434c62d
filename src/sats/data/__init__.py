"""Data: reading and writing images and DICOM, the nnU-Net raw layout, and the two
synthetic sources (the analytic phantom, GTVs inserted into real CTs)."""
