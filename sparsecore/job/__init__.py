"""The training job: ``sparsecore train`` and ``sparsecore report`` on the command line.

- :mod:`~sparsecore.job.cli`: the ``sparsecore`` command (the console script);
- :mod:`~sparsecore.job.recipe`: the training recipe, shared by the PyTorch and Keras jobs;
- :mod:`~sparsecore.job.datasets` and :mod:`~sparsecore.job.text`: Fashion-MNIST and the small
  text corpus (embedded subsets ship in ``sparsecore/data``);
- :mod:`~sparsecore.job.rundir`: a run folder that is always one consistent state.

The jobs' training loops live with their frameworks (``sparsecore.torch.train``,
``sparsecore.keras.train``); this package is framework-free, and the algorithm never imports it.
"""
