"""Run the reference BMKP on seq-cifar10 at a given seed and epoch budget (side-by-side check)."""
import sys, time, types, torch
import importlib.machinery as m; sk = types.ModuleType('sklearn'); sk.__spec__ = m.ModuleSpec('sklearn', None); sk.utils = types.ModuleType('sklearn.utils'); sk.utils.__spec__ = m.ModuleSpec('sklearn.utils', None); sk.utils.shuffle = None
sys.modules.update({'sklearn': sk, 'sklearn.utils': sk.utils})
torch.set_num_threads(1)
from torchvision.datasets import CIFAR10
CIFAR10._check_integrity = lambda self: True
CIFAR10.download = lambda self: None
import torchvision.datasets.cifar as tvc; tvc.check_integrity = lambda *a, **k: True
from utils.args import get_args
from utils.training import train_il
seed, epochs = int(sys.argv[1]), int(sys.argv[2])
sys.argv = sys.argv[:1]
args = get_args()
args.model = 'bmkp'; args.seed = seed; args.validation = False
args.device = torch.device("cpu"); args.img_dir = 'img/bmkp/'
args.dataset = 'seq-cifar10'; args.print_freq = 10
args.n_epochs = epochs; args.retrain_epochs = epochs; args.net = 'resnet18'
args.lr = 5e-2; args.batch_size = 128; args.threshold_first = 0.96; args.threshold = 0.96
args.nf = 20; args.lambd = 10; args.skip_layers = list(range(16)); args.is_bn_stats = False
args.is_update_basis = True; args.example_num = 500
start = time.time()
train_il(args)
print("wall_s", round(time.time() - start, 1))
