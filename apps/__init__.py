"""Command-line applications of taichi-dr (the ``tdr`` console script; see :mod:`apps.main`)."""
