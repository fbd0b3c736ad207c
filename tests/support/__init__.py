"""Code the tests share, none of it a test: ``from support.helpers import run_veil``. tests/ is on the import path
(pytest puts the folder of tests/conftest.py there), so ``support`` is this folder.

- ``helpers.py``: run the real ``veil`` command in a subprocess, small configs and CSV files, read metrics.
- ``references.py``: independent references (dp-accounting's PLD accountant, a per-example clipped-gradient loop).
- ``families.py``: tiny random models of every supported family, built from configs in code.
- ``secagg_loopback.py``: a SecAgg+ round between veil's ServerApp workflow and real node ClientApps, in one process.
- ``audit_hooks.py``: a deliberately broken DP mechanism, for the tests of ``veil audit``.
- ``fault_sim.py``: a script, a simulated federation with one faulty node (``python tests/support/fault_sim.py``).
"""
