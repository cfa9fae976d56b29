"""The embedded synthetic benchmark (``freezeframe synth``): labelled, deterministic videos.

``synth.render`` draws scenes and motion (frames as uint8 arrays), ``synth.encode`` writes
them as H.264, ``synth.benchmark`` writes whole tasks with manifests, ``synth.davis`` writes
a small DAVIS-2017-layout dataset with exact masks (dense evaluation). Design: ``docs/synthetic.md``.
Layer: imports only ``pipeline/`` and libraries (the same floor as ``manifests/`` and ``extract/``).
"""
