import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

import mmlab  # noqa: E402
from mmlab import viz  # noqa: E402


def test_token_status_and_attention_grid_follow_the_trace(tiny, test_samples):
    tr = mmlab.run(tiny, test_samples[0], [mmlab.methods.get("random", keep_ratio=0.25)], attention_layers=[2])
    st = viz.token_status(tr, layer=2)
    assert st.shape == (144,) and int((st == 1).sum()) == 36
    assert set(np.nonzero(st == 1)[0].tolist()) == set(tr.image_kept[0].tolist())
    g = viz.attention_grid(tr, 2)
    assert np.isnan(g).sum() == 144 - 36  # removed tokens have no attention
    is_img = tr.modality[tr.layer_tokens[2]] >= 0
    on_image = float(tr.attentions[2][:, -1].mean(0)[is_img].sum())
    assert np.nansum(g) == np.float64(on_image) or abs(np.nansum(g) - on_image) < 1e-5
