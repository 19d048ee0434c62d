"""sats: semantic-asymmetry GTV segmentation of nasopharyngeal carcinoma on planning CT.

The package follows the pipeline, one module a stage:

* data: ``volume`` (the Volume type, axes, errors), ``io`` and ``dicom`` (read and write
  images), ``dataset`` (nnU-Net raw layout, checks), ``phantom`` (the embedded synthetic
  head CT), ``lesion`` (GTVs inserted into real CTs);
* preprocessing: ``symmetry`` (the left-right mirror, planes), ``alignment`` (the
  mid-sagittal plane), ``preprocessing`` (symmetric grid, normalisation), ``patches``;
* training: ``config`` (TrainConfig, presets), ``network``, ``losses``, ``training``
  (the loop), ``run`` (the RUN folder);
* inference: ``inference`` (sliding window, native-space masks), ``export`` (RTSTRUCT, SEG);
* evaluation: ``evaluation`` (DSC, HD95, ASD, NSD), ``ablation`` (variants, paired
  statistics), ``figures``;
* ``cli`` (the ``sats`` command), ``demo``, ``progress``.
"""

__version__ = "0.1.0"
