"""Tools that are not library code: the coverage table (``python -m tools.coverage``), the demo
(``python -m tools.demo``) and the checkout's commit for reports. Run them from the repository root."""
