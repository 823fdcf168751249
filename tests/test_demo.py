from janus.demo import main


def test_demo_losses_fall_for_every_term():
    summary = main(["--steps", "150"])
    assert all(summary["fell"].values()), summary
    assert summary["last"]["ar"] < 0.5 * summary["start"]["ar"]
