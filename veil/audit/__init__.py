"""The empirical privacy audit (``veil audit``): canaries, their scores, canary nodes, the control arm, the CLI.

A wing apart from :mod:`veil.privacy`, which holds differential privacy only (and the audit's pure bound,
:mod:`veil.privacy.audit_bound`): the audit runs whole simulated federations, so it sits above the client, the
server, the task and the simulator, and nothing in veil imports it but the command line.
"""
