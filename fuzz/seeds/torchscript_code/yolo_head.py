class YOLOXHead(Module):
  __parameters__ = []
  __buffers__ = []
  training : bool
  _is_full_backward_hook : Optional[bool]
  cls_convs : __torch__.torch.nn.modules.container.___torch_mangle_290.ModuleList
  reg_convs : __torch__.torch.nn.modules.container.___torch_mangle_318.ModuleList
  cls_preds : __torch__.torch.nn.modules.container.___torch_mangle_322.ModuleList
  reg_preds : __torch__.torch.nn.modules.container.___torch_mangle_326.ModuleList
  obj_preds : __torch__.torch.nn.modules.container.___torch_mangle_330.ModuleList
  stems : __torch__.torch.nn.modules.container.___torch_mangle_343.ModuleList
  l1_loss : __torch__.torch.nn.modules.loss.L1Loss
  bcewithlog_loss : __torch__.torch.nn.modules.loss.BCEWithLogitsLoss
  iou_loss : __torch__.yolox.models.losses.IOUloss
  def forward(self: __torch__.yolox.models.yolo_head.YOLOXHead,
    argument_1: Tensor,
    argument_2: Tensor,
    argument_3: Tensor) -> Tensor:
    obj_preds = self.obj_preds
    _2 = getattr(obj_preds, "2")
    reg_preds = self.reg_preds
    _20 = getattr(reg_preds, "2")
    reg_convs = self.reg_convs
    _21 = getattr(reg_convs, "2")
    cls_preds = self.cls_preds
    _22 = getattr(cls_preds, "2")
    cls_convs = self.cls_convs
    _23 = getattr(cls_convs, "2")
    stems = self.stems
    _24 = getattr(stems, "2")
    obj_preds0 = self.obj_preds
    _1 = getattr(obj_preds0, "1")
    reg_preds0 = self.reg_preds
    _10 = getattr(reg_preds0, "1")
    reg_convs0 = self.reg_convs
    _11 = getattr(reg_convs0, "1")
    cls_preds0 = self.cls_preds
    _12 = getattr(cls_preds0, "1")
    cls_convs0 = self.cls_convs
    _13 = getattr(cls_convs0, "1")
    stems0 = self.stems
    _14 = getattr(stems0, "1")
    obj_preds1 = self.obj_preds
    _0 = getattr(obj_preds1, "0")
    reg_preds1 = self.reg_preds
    _00 = getattr(reg_preds1, "0")
    reg_convs1 = self.reg_convs
    _01 = getattr(reg_convs1, "0")
    cls_preds1 = self.cls_preds
    _02 = getattr(cls_preds1, "0")
    cls_convs1 = self.cls_convs
    _03 = getattr(cls_convs1, "0")
    stems1 = self.stems
    _04 = getattr(stems1, "0")
    _5 = (_04).forward(argument_1, )
    _6 = (_02).forward((_03).forward(_5, ), )
    _7 = (_01).forward(_5, )
    _3 = [(_00).forward(_7, ), torch.sigmoid((_0).forward(_7, )), torch.sigmoid(_6)]
    x = torch.cat(_3, 1)
    _4 = (_14).forward(argument_2, )
    _8 = (_12).forward((_13).forward(_4, ), )
    _9 = (_11).forward(_4, )
    _15 = [(_10).forward(_9, ), torch.sigmoid((_1).forward(_9, )), torch.sigmoid(_8)]
    x0 = torch.cat(_15, 1)
    _16 = (_24).forward(argument_3, )
    _17 = (_22).forward((_23).forward(_16, ), )
    _18 = (_21).forward(_16, )
    _19 = [(_20).forward(_18, ), torch.sigmoid((_2).forward(_18, )), torch.sigmoid(_17)]
    x1 = torch.cat(_19, 1)
    _25 = [torch.flatten(x, 2), torch.flatten(x0, 2), torch.flatten(x1, 2)]
    _26 = torch.permute(torch.cat(_25, 2), [0, 2, 1])
    return _26
