"""SGD: plain fine-tuning of one network across tasks, the lower bound."""
from models.continual_model import ContinualModel


class Sgd(ContinualModel):
    NAME = "sgd"
