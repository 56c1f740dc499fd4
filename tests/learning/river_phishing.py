"""River's progressive validation on its bundled Phishing data set, with the pipelines Sluice's
learners implement: StandardScaler | LogisticRegression(FTRLProximal()) and
StandardScaler | LogisticRegression(SGD(0.1)). Prints JSON: the rows in River's order, their
labels, and River's predicted P(y=1) for each row before learning it."""
import json
import sys

from river import datasets, linear_model, optim, preprocessing


def run(optimizer):
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer)
    probs = []
    for x, y in datasets.Phishing():
        probs.append(model.predict_proba_one(x).get(True, 0.0))
        model.learn_one(x, y)
    return probs


rows, labels, names = [], [], None
for x, y in datasets.Phishing():
    names = names or list(x)
    rows.append([float(x[k]) for k in names])
    labels.append(1.0 if y else 0.0)
json.dump(
    {
        "features": names,
        "rows": rows,
        "labels": labels,
        "ftrl": run(optim.FTRLProximal()),
        "sgd": run(optim.SGD(0.1)),
    },
    sys.stdout,
)
