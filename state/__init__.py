"""The pipeline's state, between the DICOM node and the ground: the one SQLite database (``index.sqlite``) and
the state store of study episodes, deliveries, dead letters and task runs that lives in it.

A package of its own because two layers write this state: the DICOM node opens and extends an episode when an
instance arrives (in the same transaction as the instance row of its index), closes idle episodes and hands them
off; the workers claim and advance them and record deliveries, dead letters and task runs. So it sits below
``dicom_node`` and ``model`` and above ``core`` (pyproject.toml, ``[tool.importlinter]``): it imports ``core``
only, and the pipeline's life cycle stays out of ``core``, the ground that knows no stage.
"""
