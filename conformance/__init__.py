"""The olmo-attn conformance harness: what people run on new hardware and what CI gates on.

``olmo-attn conformance`` (or ``python -m conformance``) fingerprints the machine, builds the case
matrix from the backends' capability table, judges every backend forward and backward against the
float64 reference in ``reference/`` with the error budgets of docs/judging.md, emulates multi-process
context parallelism, and reports (terminal matrix, JSON, JUnit XML, Markdown); the exit code is 0
iff no case that ran failed.

Public API:

* :func:`conformance.runner.run` / :func:`conformance.runner.run_cases` — run a matrix, get a
  :class:`~conformance.runner.RunReport`.
* :func:`conformance.cases.build_cases` — the case matrix (:class:`~conformance.cases.Case`).
* :func:`conformance.families.run_case` — judge one case.
* :func:`conformance.subjects.register_subject` / :func:`~conformance.subjects.registered` — add a
  backend under test (third-party, or deliberately wrong ones in the harness's own tests).
* :func:`conformance.hardware.fingerprint` — the environment fingerprint.
* :mod:`conformance.report` — ``write_json``, ``write_junit``, ``write_markdown``.
"""
