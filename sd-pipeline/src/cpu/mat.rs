//! Strided f32 matrix views (pointer, row and column strides) that the CPU products take.

/// A strided matrix operand.
#[derive(Clone, Copy)]
pub struct Mat {
    ptr: *const f32,
    /// Distance between rows, in elements.
    pub rs: isize,
    /// Distance between columns, in elements.
    pub cs: isize,
    /// A bound the caller knows on every |element| (NaN: none known); the f16 product uses it
    /// instead of scanning the operand for its scale.
    bound: f32,
}

/// A strided destination.
#[derive(Clone, Copy)]
pub struct MatMut {
    ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a product's threads only read through `Mat` and write disjoint tiles through
// `MatMut`; the caller of `matmul` keeps the memory valid for the call.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}
unsafe impl Send for MatMut {}
unsafe impl Sync for MatMut {}

impl Mat {
    pub fn new(ptr: *const f32, rs: isize, cs: isize) -> Self {
        Self {
            ptr,
            rs,
            cs,
            bound: f32::NAN,
        }
    }
    /// The same view, its every finite |element| known to be at most `bound` (softmax weights:
    /// 1).
    pub fn bounded(self, bound: f32) -> Self {
        Self { bound, ..self }
    }
    /// The bound given by [`Mat::bounded`], if any.
    pub(super) fn bound(self) -> Option<f32> {
        (self.bound >= 0.0).then_some(self.bound)
    }
    pub fn ptr(self) -> *const f32 {
        self.ptr
    }
    pub(super) fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    /// # Safety
    /// The element must lie inside the matrix's allocation.
    pub(super) unsafe fn at(self, r: usize, c: usize) -> *const f32 {
        self.ptr.offset(r as isize * self.rs + c as isize * self.cs)
    }
    /// # Safety
    /// As [`Mat::at`].
    pub(super) unsafe fn offset(self, r: usize, c: usize) -> Self {
        Self {
            ptr: self.at(r, c),
            ..self
        }
    }
}

impl MatMut {
    pub fn new(ptr: *mut f32, rs: isize, cs: isize) -> Self {
        Self { ptr, rs, cs }
    }
    pub fn ptr(self) -> *mut f32 {
        self.ptr
    }
    /// # Safety
    /// As [`Mat::at`].
    pub(super) unsafe fn at(self, r: usize, c: usize) -> *mut f32 {
        self.ptr.offset(r as isize * self.rs + c as isize * self.cs)
    }
    /// # Safety
    /// As [`Mat::at`].
    pub(super) unsafe fn offset(self, r: usize, c: usize) -> Self {
        Self {
            ptr: self.at(r, c),
            ..self
        }
    }
}
