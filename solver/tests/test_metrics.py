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
