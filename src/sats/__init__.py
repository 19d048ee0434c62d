"""sats: semantic-asymmetry GTV segmentation of nasopharyngeal carcinoma on planning CT.

The package follows the pipeline, one subpackage a stage:

* ``sats.data``: ``io`` and ``dicom`` (read and write images, DICOM CT series),
  ``dataset`` (nnU-Net raw layout, checks, folds), ``phantom`` (the embedded synthetic head
  CT), ``lesion`` (GTVs inserted into real CTs: the real-anatomy test bed);
* ``sats.geometry``: ``volume`` (the Volume type, axes, errors, the SimpleITK boundary),
  ``symmetry`` (the left-right mirror, planes), ``grid`` (the symmetric grid, resampling,
  boxes), ``alignment`` (the plane searches), ``preprocessing`` (the :class:`Preprocessor`
  every CT goes through, and the one place a plane is found), ``landmarks`` (the
  nasopharynx), ``asymmetry`` (the label-free asymmetric region m_unsup);
* ``sats.model``: ``config`` (TrainConfig with the paper's values, presets, variants,
  ``build``), ``network``, ``losses``, ``patches``, ``cache`` (preprocessed training cases),
  ``training`` (the loop), ``run`` (the RUN folder);
* ``sats.predict``: ``roi`` (where to look), ``inference`` (sliding window back to the input
  grid), ``export`` (RTSTRUCT, SEG), ``serve`` (the DICOM node);
* ``sats.evaluation``: ``metrics`` (DSC, HD95, ASD, NSD in mm), ``ablation`` (variants,
  paired statistics), ``figures``;
* ``cli`` (the ``sats`` command), ``demo``, ``hardware`` (cores, bf16), ``progress``.
"""

__version__ = "0.1.0"
