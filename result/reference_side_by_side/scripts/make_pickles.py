"""Write the CIFAR-10 JPEG copy as torchvision's pickle layout, in a seeded random order."""
import os, pickle, sys
import numpy as np
from PIL import Image
src, dst = sys.argv[1], sys.argv[2]
classes = sorted(os.listdir(os.path.join(src, "train")))
rng = np.random.default_rng(0)
def load(split):
    items = [(os.path.join(src, split, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(src, split, c)))]
    order = rng.permutation(len(items))
    items = [items[j] for j in order]
    data = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in items])
    return data.transpose(0, 3, 1, 2).reshape(len(items), -1), [l for _, l in items]
d, l = load("train")
for b in range(5):
    s = slice(b * 10000, (b + 1) * 10000)
    with open(os.path.join(dst, f"data_batch_{b+1}"), "wb") as f:
        pickle.dump({"data": d[s], "labels": l[s]}, f)
d, l = load("test")
with open(os.path.join(dst, "test_batch"), "wb") as f:
    pickle.dump({"data": d, "labels": l}, f)
with open(os.path.join(dst, "batches.meta"), "wb") as f:
    pickle.dump({"label_names": classes}, f)
print("ok", len(l))
