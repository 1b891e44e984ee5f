"""A torch re-creation of DADA's official code (`Noahsark/DADA`, commit 726ee8b), written from its
criteria/dadaproxy.py (the criterion), architectures/resnet50.py (the 'double' ResNet-50 embedding) and main.py
(the training loop), for the parity tests (tests/test_dada.py) and the benchmark (benchmarks/dada_step.py).

Nothing here calls dml_jax. Parameters come in and go out as flat numpy dicts in dml_jax's layout; random draws
(mixing weights as float32 pairs, dropout keep masks) are given, so both sides use the same ones.
Left out: the GradScaler (without autocast and without overflow it scales the loss and unscales the gradients
by a power of two, which is exact) and the CUDA device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# -- torch re-creation of the authors' criterion (criteria/dadaproxy.py) ---------------------------------------


def _linear(p: dict) -> torch.nn.Linear:
  kernel = np.asarray(p["kernel"])
  layer = torch.nn.Linear(*kernel.shape)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
    layer.bias.copy_(torch.from_numpy(np.array(p["bias"])))
  return layer


def _batchnorm(p: dict, s: dict) -> torch.nn.BatchNorm1d:
  bn = torch.nn.BatchNorm1d(len(p["scale"]))
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(np.array(p["scale"])))
    bn.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    bn.running_mean.copy_(torch.from_numpy(np.array(s["mean"])))
    bn.running_var.copy_(torch.from_numpy(np.array(s["var"])))
  return bn


class TorchUni(torch.nn.Module):
  """Uni_Predictor: fc1 -> bn1 -> relu -> fc2 [-> bn2]."""

  def __init__(self, p, s):
    super().__init__()
    self.fc1, self.bn1, self.fc2 = _linear(p["fc1"]), _batchnorm(p["bn1"], s["bn1"]), _linear(p["fc2"])
    self.bn2 = _batchnorm(p["bn2"], s["bn2"]) if "bn2" in p else None

  def forward(self, x):
    x = self.fc2(F.relu(self.bn1(self.fc1(x))))
    return self.bn2(x) if self.bn2 is not None else x


class TorchDis(torch.nn.Module):
  """Dis_Predictor: fc1 -> bn1 -> relu -> dropout -> fc2 -> bn2 -> relu -> dropout -> fc3 [-> bn3]; the dropout
  masks are given (consumed in call order), the layer's scaling 1 / (1 - p) as nn.Dropout in training mode."""

  def __init__(self, p, s, dropout):
    super().__init__()
    self.fc1, self.bn1 = _linear(p["fc1"]), _batchnorm(p["bn1"], s["bn1"])
    self.fc2, self.bn2 = _linear(p["fc2"]), _batchnorm(p["bn2"], s["bn2"])
    self.fc3 = _linear(p["fc3"])
    self.bn3 = _batchnorm(p["bn3"], s["bn3"]) if "bn3" in p else None
    self.p, self.masks = dropout, []

  def dropout(self, x):
    if not self.masks:  # no masks given: the eval-mode identity
      return x
    mask = torch.from_numpy(np.array(self.masks.pop(0)[: x.shape[0]])).float().to(x.device)
    return x * (mask / (1.0 - self.p))

  def forward(self, x):
    x = self.dropout(F.relu(self.bn1(self.fc1(x))))
    x = self.dropout(F.relu(self.bn2(self.fc2(x))))
    x = self.fc3(x)
    return self.bn3(x) if self.bn3 is not None else x


def get_pos_pairs(labels: torch.Tensor):
  """The code's get_pos_pairs: all ordered positive pairs (torch.where order), one per label by np.unique."""
  matches = (labels.unsqueeze(1) == labels.unsqueeze(0)).byte()
  matches.fill_diagonal_(0)
  a, p = torch.where(matches)
  _, unique_idx = np.unique(labels[a].cpu().numpy(), return_index=True)
  return a[unique_idx], p[unique_idx]


class TorchCriterion(torch.nn.Module):
  """criteria/dadaproxy.py's Criterion (mix_mode 'random', shift_scale 1, proxy_dim 0, mix_extension off)."""

  def __init__(self, proxies, disc, disc_stats, opts):
    super().__init__()
    self.opts = opts
    self.proxies = torch.nn.Parameter(torch.from_numpy(np.asarray(proxies).copy()))
    self.uni = TorchUni(disc["domain"], disc_stats["domain"])
    self.dis = TorchDis(disc["category"], disc_stats["category"], opts["dropout"])
    self.pairs = []  # float32 mixing weights, consumed in the code's draw order

  def set_draws(self, pairs, masks):
    self.pairs = [p for p in pairs] if self.opts["pos_class_mix"] else [p for p in pairs[2:]]
    self.dis.masks = list(masks)

  def _weighted(self, t1, t2):
    w = self.pairs.pop(0)
    return float(w[0]) * t1 + float(w[1]) * t2

  def _prepare_pos_mix(self, batch, labels):
    idx_a, idx_p = get_pos_pairs(labels)
    a_labels = labels[idx_a]
    c_batch = torch.cat((batch, self._weighted(batch[idx_a], batch[idx_p])))
    c_proxies = torch.cat((self.proxies[labels], self._weighted(self.proxies[labels[idx_a]],
                                                                  self.proxies[labels[idx_p]])))
    return c_batch, c_proxies, torch.cat((labels, a_labels))

  def forward(self, batch, labels):
    if self.opts["pos_class_mix"]:
      batch, self.ex_proxies, labels = self._prepare_pos_mix(batch, labels)
    self.proxy_loss = self.compute_proxyloss(batch, labels)
    r = self.opts["d_dis_ratio"]
    self.u_dis_loss = (1.0 - r) * self.compute_unit_discriminator(batch, labels)
    self.d_dis_loss = r * self.compute_dis_discriminator(batch, labels)[2]
    return self.opts["oproxy_ratio"] * self.proxy_loss + self.opts["dis_gamma"] * (self.d_dis_loss - self.u_dis_loss)

  def discriminator_forward(self, batch, labels):
    if self.opts["pos_class_mix"]:
      batch, self.ex_proxies, labels = self._prepare_pos_mix(batch, labels)
    r = self.opts["d_dis_ratio"]
    self.u_loss = (1.0 - r) * self.compute_unit_discriminator(batch, labels)
    self.d_loss = r * self.compute_dis_discriminator(batch, labels)[0]
    return self.u_loss + self.d_loss

  def _sample_proxies(self, labels):
    return self.ex_proxies if self.opts["pos_class_mix"] else self.proxies[labels]

  def compute_dis_discriminator(self, batch, labels):
    proxies = self._sample_proxies(labels)
    batch_mix = self._weighted(batch, proxies)
    batch, batch_mix = F.normalize(batch, dim=-1), F.normalize(batch_mix, dim=-1)
    s_out, t_out = self.dis(batch), self.dis(batch_mix)
    s_loss = 2.0 * F.cross_entropy(s_out, labels.long())
    ps, pt = F.softmax(s_out, dim=1), F.softmax(t_out, dim=1)
    dis = (torch.norm(ps, "nuc") - torch.norm(pt, "nuc")) / s_out.shape[0]
    dis_loss = self.opts["d_discrepancy_ratio"] * dis
    self.terms = dict(category=s_loss, discrepancy=dis_loss)
    return s_loss - dis_loss, dis_loss, s_loss + dis_loss

  def compute_unit_discriminator(self, batch, labels):
    n = batch.shape[0]
    proxies = self._sample_proxies(labels)
    batch_mix = self._weighted(batch, proxies)
    batch, batch_mix, proxies = (F.normalize(v, dim=-1) for v in (batch, batch_mix, proxies))
    loss = sum(F.cross_entropy(self.uni(v), torch.full((n,), d, dtype=torch.long, device=v.device))
               for d, v in enumerate((batch, batch_mix, proxies)))
    self.domain = loss
    return loss

  def compute_proxyloss(self, batch, labels):
    hp = self.opts["loss"]
    batch = F.normalize(batch, dim=-1)
    lab = labels.unsqueeze(1)
    same = (lab.T == lab.view(-1, 1)).T
    diff = (torch.arange(self.proxies.shape[0], device=lab.device).unsqueeze(1) != lab.T).T
    proxies_norm = F.normalize(self.proxies, dim=-1)
    proxies = F.normalize(self.ex_proxies, dim=-1) if self.opts["pos_class_mix"] else proxies_norm[labels]
    w_pos = -hp["pos_alpha"] * (batch.mm(proxies.T) - hp["pos_delta"])
    w_neg = hp["neg_alpha"] * (batch.mm(proxies_norm.T) - hp["neg_delta"])
    return self.masked_logsumexp(w_pos, same).mean() + self.masked_logsumexp(w_neg, diff).mean()

  @staticmethod
  def masked_logsumexp(sims, mask, dim=0):
    sims = sims.masked_fill(~mask, torch.finfo(sims.dtype).min)
    dims = list(sims.shape)
    dims[dim] = 1
    sims = torch.cat([sims, torch.zeros(dims, dtype=sims.dtype, device=sims.device)], dim=dim)
    out = torch.logsumexp(sims, dim=dim, keepdim=True)
    return out.masked_fill(~torch.any(mask, dim=dim, keepdim=True), 0)

  def disc_stats(self):
    out = {}
    for name, module in (("domain", self.uni), ("category", self.dis)):
      for bn in ("bn1", "bn2", "bn3"):
        layer = getattr(module, bn, None)
        if isinstance(layer, torch.nn.BatchNorm1d):
          out[f"{name}/{bn}/mean"] = layer.running_mean.cpu().numpy().copy()
          out[f"{name}/{bn}/var"] = layer.running_var.cpu().numpy().copy()
    return out

  def disc_params(self):
    """{'domain/fc1/kernel': ..., 'domain/bn1/scale': ...} in dml_jax's layout."""
    out = {}
    for name, module in (("domain", self.uni), ("category", self.dis)):
      for layer_name, layer in module.named_children():
        if isinstance(layer, torch.nn.Linear):
          out[f"{name}/{layer_name}/kernel"] = layer.weight.detach().cpu().numpy().T.copy()
          out[f"{name}/{layer_name}/bias"] = layer.bias.detach().cpu().numpy().copy()
        elif isinstance(layer, torch.nn.BatchNorm1d):
          out[f"{name}/{layer_name}/scale"] = layer.weight.detach().cpu().numpy().copy()
          out[f"{name}/{layer_name}/bias"] = layer.bias.detach().cpu().numpy().copy()
    return out

  def disc_grads(self):
    out = {}
    for name, module in (("domain", self.uni), ("category", self.dis)):
      for layer_name, layer in module.named_children():
        if isinstance(layer, torch.nn.Linear):
          out[f"{name}/{layer_name}/kernel"] = layer.weight.grad.numpy().T.copy()
          out[f"{name}/{layer_name}/bias"] = layer.bias.grad.numpy().copy()
        elif isinstance(layer, torch.nn.BatchNorm1d):
          out[f"{name}/{layer_name}/scale"] = layer.weight.grad.numpy().copy()
          out[f"{name}/{layer_name}/bias"] = layer.bias.grad.numpy().copy()
    return out


def torch_criterion_call(disc: dict, disc_stats: dict, x: np.ndarray, labels: np.ndarray, proxies: np.ndarray,
                         pairs: list, masks: list, opts: dict, mode: str) -> dict:
  """One call of the authors' criterion: `discriminator_forward` (mode 'discriminator') or `forward`
  ('generator') on features x [B, E], with backward. Returns losses, gradients (discriminator parameters; x
  and proxies) and the discriminators' running statistics afterwards."""
  crit = TorchCriterion(proxies, disc, disc_stats, opts)
  crit.set_draws(pairs, masks)
  xt = torch.from_numpy(np.asarray(x).copy()).requires_grad_(True)
  yt = torch.from_numpy(np.asarray(labels)).long()
  loss = crit.discriminator_forward(xt, yt) if mode == "discriminator" else crit(xt, yt)
  loss.backward()
  out = {"loss": loss.detach().numpy(), "domain": crit.domain.detach().numpy(),
         "category": crit.terms["category"].detach().numpy(), "discrepancy": crit.terms["discrepancy"].detach().numpy(),
         "x_grad": xt.grad.numpy(), "proxies_grad": crit.proxies.grad.numpy()}
  if mode == "generator":
    out["proxy_loss"] = crit.proxy_loss.detach().numpy()
  out.update({f"grad/{k}": v for k, v in crit.disc_grads().items()})
  out.update({f"stats/{k}": v for k, v in crit.disc_stats().items()})
  return out


# -- torch re-creation of the network (architectures/resnet50.py) and the loop (main.py) ---------------------


def _to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  if path.endswith("kernel") and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
  if path.endswith("kernel"):
    return value.T  # [in, out] -> [out, in]
  return value


def _from_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  if path.endswith("kernel") and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if path.endswith("kernel"):
    return value.T
  return value


def torch_network(p: dict, s: dict, images_nchw, layers, *, train_bn: bool, backbone_grad: bool):
  """The 'double' ResNet-50 embedding as torch computes it: torchvision bottleneck ResNet (stride in the 3x3)
  -> max pool + avg pool -> Linear -> LayerNorm without affine. p/s: torch tensors keyed by dml_jax paths."""
  b = "model/backbone/"

  def conv(name, x, stride, pad):
    return F.conv2d(x, p[b + name + "/kernel"], stride=stride, padding=pad)

  def bn(name, x):
    return F.batch_norm(x, s[b + name + "/mean"], s[b + name + "/var"], p[b + name + "/scale"], p[b + name + "/bias"],
                        training=train_bn, momentum=0.1, eps=1e-5)

  with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
    x = F.max_pool2d(F.relu(bn("bn1", conv("conv1", images_nchw, 2, 3))), 3, 2, 1)
    for stage, blocks in enumerate(layers):
      for block in range(blocks):
        pre = f"layer{stage + 1}/{block}/"
        stride = 2 if stage > 0 and block == 0 else 1
        y = F.relu(bn(pre + "bn1", conv(pre + "conv1", x, 1, 0)))
        y = F.relu(bn(pre + "bn2", conv(pre + "conv2", y, stride, 1)))
        y = bn(pre + "bn3", conv(pre + "conv3", y, 1, 0))
        shortcut = bn(pre + "downsample/1", conv(pre + "downsample/0", x, stride, 0)) if (
            b + pre + "downsample/0/kernel" in p) else x
        x = F.relu(y + shortcut)
    pooled = torch.amax(x, dim=(2, 3)) + torch.mean(x, dim=(2, 3))
  z = F.linear(pooled, p["model/embedding/kernel"], p["model/embedding/bias"])
  return F.layer_norm(z, (z.shape[-1],), eps=1e-5)


class TorchDADATraining:
  """main.py's loop: `iteration(...)` is one batch (the no-grad forward, d_step discriminator steps, the
  generator step unless in d_warmup), `end_epoch(epoch)` steps the three schedulers once the warm-ups are over.

  params / stats: flat numpy dicts in dml_jax's layout (backbone, embedding, proxies, discriminators; BN
  statistics). hp: lr, decay, proxy_lr, dis_lr, dis_decay, warmup, step_size, gamma, layers, bn_freeze.
  device: where the tensors live ('cpu' or 'cuda', for the benchmark).
  """

  def __init__(self, params: dict, stats: dict, opts: dict, hp: dict, device: str = "cpu"):
    self.opts, self.hp = opts, hp
    self.device = torch.device(device)
    self.net = {k: torch.nn.Parameter(torch.from_numpy(_to_torch_layout(k, np.asarray(v)).copy()).to(self.device))
                for k, v in params.items() if k.startswith("model/")}
    self.net_stats = {k: torch.from_numpy(np.asarray(v).copy()).to(self.device) for k, v in stats.items()
                      if k.startswith("model/")}

    def nested(flat):
      sub = {k[len("discriminators/"):]: v for k, v in flat.items() if k.startswith("discriminators/")}
      out = {}
      for k, v in sub.items():
        node = out
        *parents, leaf = k.split("/")
        for part in parents:
          node = node.setdefault(part, {})
        node[leaf] = v
      return out

    self.crit = TorchCriterion(params["loss/proxies"], nested(params), nested(stats), opts).to(self.device)
    backbone = [v for k, v in self.net.items() if k.startswith("model/backbone/")]
    head = [self.net["model/embedding/kernel"], self.net["model/embedding/bias"]]
    self.optimizer = torch.optim.Adam(backbone + head, lr=hp["lr"], weight_decay=hp["decay"])
    self.dis_optimizer = torch.optim.Adam(list(self.crit.uni.parameters()) + list(self.crit.dis.parameters()),
                                          lr=hp["dis_lr"], weight_decay=hp["dis_decay"])
    self.proxy_optimizer = torch.optim.Adam([self.crit.proxies], lr=hp["proxy_lr"])
    self.schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=hp["step_size"], gamma=hp["gamma"])
                       for o in (self.optimizer, self.dis_optimizer, self.proxy_optimizer)]

  def network(self, images_nchw, warm: bool):
    return torch_network(self.net, self.net_stats, images_nchw, self.hp["layers"], train_bn=not self.hp["bn_freeze"],
                         backbone_grad=not warm)

  def iteration(self, epoch: int, images_nhwc: np.ndarray, labels: np.ndarray, draws: list) -> tuple[float, float]:
    """draws: (pairs, masks) per sub-step, d_step discriminator steps then the generator step. Returns the last
    discriminator loss and the generator loss (None in d_warmup)."""
    warm, d_warm = epoch < self.hp["warmup"], epoch < self.opts["d_warmup"]
    x_in = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc).transpose(0, 3, 1, 2))).to(self.device)
    y = torch.from_numpy(np.asarray(labels)).long().to(self.device)
    with torch.no_grad():
      x = self.network(x_in, warm)
    for r in range(self.opts["d_step"]):
      self.dis_optimizer.zero_grad()
      self.crit.set_draws(*draws[r])
      d_loss = self.crit.discriminator_forward(x, y)
      d_loss.backward()
      self.dis_optimizer.step()
    g_loss = None
    if not d_warm:
      self.optimizer.zero_grad()
      self.proxy_optimizer.zero_grad()  # discards the proxies' gradients of the discriminator steps
      self.crit.set_draws(*draws[self.opts["d_step"]])
      loss = self.crit(self.network(x_in, warm), y)
      g_loss = float(loss.detach())
      loss.backward()
      self.proxy_optimizer.step()
      self.optimizer.step()
    return float(d_loss.detach()), g_loss

  def end_epoch(self, epoch: int) -> None:
    if epoch >= self.hp["warmup"] and epoch >= self.opts["d_warmup"]:
      for scheduler in self.schedulers:
        scheduler.step()

  def snapshot(self) -> dict:
    """Parameters and running statistics, flat, in dml_jax's layout (statistics under 'stats/')."""
    out = {k: _from_torch_layout(k, v.detach().cpu().numpy()).copy() for k, v in self.net.items()}
    out["loss/proxies"] = self.crit.proxies.detach().cpu().numpy().copy()
    out.update({f"discriminators/{k}": v for k, v in self.crit.disc_params().items()})
    out.update({f"stats/{k}": v.cpu().numpy().copy() for k, v in self.net_stats.items()})
    out.update({f"stats/discriminators/{k}": v for k, v in self.crit.disc_stats().items()})
    return out


def torch_training(params: dict, stats: dict, epochs: list, opts: dict, hp: dict) -> list[dict]:
  """One iteration per epoch: epochs = [(images NHWC, labels, draws per sub-step)]. Returns after every epoch
  the parameters, running statistics and the last discriminator / generator losses (flat numpy dicts)."""
  training = TorchDADATraining(params, stats, opts, hp)
  history = []
  for epoch, (images, labels, draws) in enumerate(epochs):
    d_loss, g_loss = training.iteration(epoch, images, labels, draws)
    training.end_epoch(epoch)
    history.append({**training.snapshot(), "d_loss": d_loss, "g_loss": g_loss})
  return history
