"""Prediction: where to look (ROI), sliding-window inference back to the input grid,
DICOM RTSTRUCT/SEG export and the DICOM node."""
