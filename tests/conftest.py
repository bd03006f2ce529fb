"""The suite's one hook: the torchvision matrix (tests/test_tracing.py) starts in the background
as soon as it is collected, so that its exports run while the rest of the suite does."""

from . import test_tracing


def pytest_collection_finish(session):
    if any(
        getattr(item, "originalname", None)
        == "test_torchvision_models_take_removal_and_export_or_are_refused_at_check"
        for item in session.items
    ):
        test_tracing.start_matrix()
