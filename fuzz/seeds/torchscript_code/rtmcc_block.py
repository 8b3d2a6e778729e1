class RTMCCBlock(Module):
  __parameters__ = ["gamma", "beta", ]
  __buffers__ = []
  gamma : Tensor
  beta : Tensor
  training : bool
  _is_full_backward_hook : Optional[bool]
  drop_path : __torch__.torch.nn.modules.linear.Identity
  o : __torch__.torch.nn.modules.linear.___torch_mangle_902.Linear
  uv : __torch__.torch.nn.modules.linear.___torch_mangle_903.Linear
  ln : __torch__.mmpose.models.utils.transformer.___torch_mangle_904.ScaleNorm
  act_fn : __torch__.torch.nn.modules.activation.___torch_mangle_905.SiLU
  res_scale : __torch__.mmpose.models.utils.rtmcc_block.Scale
  def forward(self: __torch__.mmpose.models.utils.rtmcc_block.RTMCCBlock,
    argument_1: Tensor) -> Tensor:
    res_scale = self.res_scale
    drop_path = self.drop_path
    o = self.o
    beta = self.beta
    gamma = self.gamma
    act_fn = self.act_fn
    uv = self.uv
    ln = self.ln
    _0 = (uv).forward((ln).forward(argument_1, ), )
    _1 = torch.split_with_sizes((act_fn).forward(_0, ), [64, 64, 16], 2)
    u, v, base, = _1
    _2 = torch.unsqueeze(base, 2)
    _3 = torch.unsqueeze(torch.unsqueeze(gamma, 0), 1)
    _4 = torch.slice(_3, 2, 0, 9223372036854775807)
    base0 = torch.add(torch.mul(_2, _4), beta)
    q, k, = torch.unbind(base0, 2)
    qk = torch.bmm(q, torch.permute(k, [0, 2, 1]))
    input = torch.div(qk, CONSTANTS.c1)
    kernel = torch.square(torch.relu(input))
    input0 = torch.mul(u, torch.bmm(kernel, v))
    _5 = (o).forward(input0, )
    _6 = (drop_path).forward()
    input1 = torch.add((res_scale).forward(argument_1, ), _5)
    return input1
class Scale(Module):
  __parameters__ = ["scale", ]
  __buffers__ = []
  scale : Tensor
  training : bool
  _is_full_backward_hook : Optional[bool]
  def forward(self: __torch__.mmpose.models.utils.rtmcc_block.Scale,
    argument_1: Tensor) -> Tensor:
    scale = self.scale
    return torch.mul(argument_1, scale)
