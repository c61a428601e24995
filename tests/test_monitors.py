import torch

from eval.knn import knn_scores
from jepa.monitors import CollapseMonitor, effective_rank


def test_effective_rank_closed_forms():
    torch.manual_seed(0)
    assert abs(effective_rank(torch.randn(4096, 1) @ torch.randn(1, 32)).item() - 1.0) < 1e-2
    eye = torch.eye(16).repeat(8, 1)  # 16 equal singular values
    assert abs(effective_rank(eye).item() - 16.0) < 1e-3


def test_collapse_monitor_warns_on_std_and_rank_drop():
    torch.manual_seed(0)
    monitor = CollapseMonitor()
    healthy = torch.randn(512, 32)
    _, warnings = monitor.update({"pred": healthy, "target": healthy})
    assert warnings == []
    collapsed = torch.randn(512, 1) @ torch.randn(1, 32) * 0.01
    stats, warnings = monitor.update({"pred": collapsed, "target": healthy})
    assert stats["collapse/pred_rank"] < 2
    assert any("collapse/pred_std" in w for w in warnings)
    assert any("collapse/pred_rank" in w for w in warnings)
    assert not any("target" in w for w in warnings)
    _, warnings = monitor.update({"pred": collapsed, "target": healthy})
    assert warnings == []  # reported once while it lasts
    _, warnings = monitor.update({"pred": healthy, "target": healthy})
    assert len(warnings) == 2 and all("the condition has ended" in w for w in warnings)
    _, warnings = monitor.update({"pred": collapsed, "target": healthy})
    assert len(warnings) == 2 and all("reported once" in w for w in warnings)


def test_knn_votes():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    scores = knn_scores(bank, labels, queries, num_classes=2, ks=[2])[2]
    assert scores.argmax(1).tolist() == [0, 1]
