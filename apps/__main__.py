"""``python -m apps`` runs the ``tdr`` command line."""

from apps.main import app

if __name__ == "__main__":
    app(prog_name="tdr")
