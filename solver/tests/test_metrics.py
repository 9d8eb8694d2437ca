import pytest

from captcha_solver.metrics import Metrics, new_metrics


def test_render_counters_and_gauges():
    m = new_metrics()
    m.inc("solves_total", outcome="solved")
    m.inc("solves_total", outcome="solved")
    m.inc("provider_errors_total", code='ERR"X')
    m.gauge("key_version", "v", lambda: [((), 7.0)])
    text = m.render()
    assert "# TYPE captcha_solver_solves_total counter" in text
    assert 'captcha_solver_solves_total{outcome="solved"} 2' in text
    assert 'captcha_solver_provider_errors_total{code="ERR\\"X"} 1' in text
    assert "# TYPE captcha_solver_key_version gauge" in text
    assert "captcha_solver_key_version 7" in text
    assert text.endswith("\n")
    assert m.value("solves_total", outcome="solved") == 2


def test_gauge_without_value_renders_no_sample():
    m = Metrics()
    m.gauge("key_age_seconds", "age", lambda: [])
    assert m.render().splitlines() == [
        "# HELP captcha_solver_key_age_seconds age",
        "# TYPE captcha_solver_key_age_seconds gauge",
    ]


def test_histogram_renders_cumulative_buckets_sum_and_count():
    m = Metrics()
    m.histogram("solve_duration_seconds", "d", [1, 5, 0.5])
    for value in (0.2, 0.5, 0.7, 3.0, 9.0):
        m.observe("solve_duration_seconds", value, outcome="solved", method="base64")
    m.observe("solve_duration_seconds", 2.0, method="base64", outcome="timeout")
    lines = m.render().splitlines()
    name = "captcha_solver_solve_duration_seconds"
    assert lines[:2] == [f"# HELP {name} d", f"# TYPE {name} histogram"]
    solved = 'method="base64",outcome="solved"'
    assert lines[2:8] == [
        f'{name}_bucket{{{solved},le="0.5"}} 2',  # 0.5 itself is in the 0.5 bucket (le)
        f'{name}_bucket{{{solved},le="1"}} 3',
        f'{name}_bucket{{{solved},le="5"}} 4',
        f'{name}_bucket{{{solved},le="+Inf"}} 5',
        f"{name}_sum{{{solved}}} 13.4",
        f"{name}_count{{{solved}}} 5",
    ]
    timeout = 'method="base64",outcome="timeout"'
    assert f'{name}_bucket{{{timeout},le="1"}} 0' in lines
    assert f'{name}_bucket{{{timeout},le="5"}} 1' in lines
    assert f"{name}_count{{{timeout}}} 1" in lines
    assert m.histogram_count("solve_duration_seconds", method="base64", outcome="solved") == 5
    assert m.histogram_count("solve_duration_seconds", method="x", outcome="solved") == 0


def test_histogram_without_observations_renders_no_sample():
    m = Metrics()
    m.histogram("solve_duration_seconds", "d", [1.0])
    assert m.render().splitlines() == [
        "# HELP captcha_solver_solve_duration_seconds d",
        "# TYPE captcha_solver_solve_duration_seconds histogram",
    ]


@pytest.mark.parametrize("buckets", [[], [1.0, 1.0], [1.0, float("inf")]])
def test_histogram_refuses_bad_buckets(buckets):
    with pytest.raises(ValueError, match="buckets"):
        Metrics().histogram("h", "h", buckets)


def test_histogram_refuses_le_label():
    m = Metrics()
    m.histogram("h", "h", [1.0])
    with pytest.raises(ValueError, match="le"):
        m.observe("h", 1.0, le="2")


def test_new_metrics_has_the_solve_duration_histogram():
    text = new_metrics().render()
    assert "# TYPE captcha_solver_solve_duration_seconds histogram" in text
