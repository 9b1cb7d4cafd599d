"""The package README says what the code does: its metrics and the peers' tests that do not apply."""

from pathlib import Path

LAYER = Path(__file__).resolve().parent.parent


def readme_table(heading):
    """The rows of the first table under ``heading`` in the package README, as lists of cells."""
    text = (LAYER / "README.md").read_text().split(f"\n{heading}\n", 1)[1]
    rows = ("|" + text.split("\n\n|", 1)[1]).split("\n\n", 1)[0].splitlines()
    return [[cell.strip().strip("`") for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def test_the_readme_lists_every_metric_as_the_code_names_it():
    from channels_redis_cluster.metrics import EVENTS

    documented = {name: text for name, text in readme_table("## Metrics")}
    assert set(documented) == set(EVENTS)
    for name, text in EVENTS.items():
        assert documented[name].replace("`", "").lower() == text.replace("`", "").lower(), name


def test_the_readme_lists_the_peers_tests_that_do_not_apply_with_their_reasons():
    from peers.conftest import NOT_APPLICABLE

    assert dict(readme_table("## Tested with the peers' own suites")) == NOT_APPLICABLE
