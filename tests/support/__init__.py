"""What the tests share and are not tests themselves: fake and real servers (Kaggle, MLflow, Prefect),
fixtures registered for every test by tests/conftest.py (`pytest_plugins`), and helpers for child
processes. Test modules import from here (and `tests.conftest`), never from one another."""
