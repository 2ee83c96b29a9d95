"""Screen multi-scale test-time augmentation: each fold model run at several network input sizes
(the shipped 256 px and 192-320 px; SA-UNet is fully convolutional), probabilities averaged over sizes
and, with two runs, over both, scored per image on the fold's held-out images against the first
run at 256 px, threshold 0.5 (paired two-sided Wilcoxon, scipy).

    python benchmarks/scale_tta_screen.py FOLDS RUNS      e.g.  1 sa_unet_e2_dice_ce_poly,sa_unet_e2_seed1

RUNS are names under runs/study holding fold_k/ runs; ../shared/data/usgra-seg is the data. A
screen, printed only: about 3 s per image and run on the 2-core CPU.
"""
import sys
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

sys.path.insert(0,'benchmarks')
from postprocess_cv import dice

from nerveseg.config import RunConfig
from nerveseg.data.io import read_mask
from nerveseg.data.media import read_frame
from nerveseg.data.samples import discover_samples
from nerveseg.inference.predictor import Predictor

samples,_=discover_samples(Path('../shared/data/usgra-seg'))
by={s.stem:s for s in samples}
folds=[int(x) for x in sys.argv[1].split(',')]
runs=sys.argv[2].split(',')
sizes=(192,224,256,288,320)
res={}
for k in folds:
  for r in runs:
    fr=Path(f'runs/study/{r}/fold_{k}')
    cfg=RunConfig.load(fr/'config.json')
    p=Predictor.from_run(fr, device='cpu', tta=False)
    p.config.inference.keep_largest=()
    for s in cfg.val_stems:
        img,_,_=read_frame(by[s].image_path, by[s].frame)
        for z in sizes:
            p.size=z
            res.setdefault((r,z),{})[s]=p.predict(img).astype(np.float32)
stems=sorted(res[(runs[0],256)])
truth={s:read_mask(by[s].mask_path,label=1,image_shape=res[(runs[0],256)][s].shape) for s in stems}
def sc(keys,t=0.5):
    r=[dice(np.mean([res[k][s] for k in keys],0)>=t,truth[s]) for s in stems]
    return np.array([x[0] for x in r]), sum(x[1] for x in r)
base,_=sc([(runs[0],256)])
combos={f'{r}@{z}':[(r,z)] for r in runs for z in sizes}
for r in runs:
    combos[f'{r}@224+256+288']=[(r,224),(r,256),(r,288)]
    combos[f'{r}@256+288']=[(r,256),(r,288)]
    combos[f'{r}@256+320']=[(r,256),(r,320)]
if len(runs)>1:
    combos['pair@256']=[(r,256) for r in runs]
    combos['pair@256+288']=[(r,z) for r in runs for z in (256,288)]
for name,keys in combos.items():
  for t in (0.5,0.4):
    d,m=sc(keys,t)
    print(f'{name:40s} t={t} {d.mean():.3f} miss {m} diff {np.mean(d-base):+.3f} p {wilcoxon(d,base).pvalue if np.any(d!=base) else 1:.2g}')
