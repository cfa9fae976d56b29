"""The application layer on top of the library: the ``freezeframe`` command line
(:mod:`freezeframe.cli`) and the end-to-end demo (:mod:`freezeframe.demo`).

Nothing in ``pipeline/``, ``manifests/``, ``synth/``, ``extract/`` or ``train/`` imports this package.
"""
