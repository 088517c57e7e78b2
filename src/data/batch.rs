//! Batches for training and evaluation: a small seeded generator ([`Rng`], SplitMix64) that
//! derives every epoch's stream from (seed, epoch), so a resumed run sees exactly the data
//! order and augmentation of an uninterrupted one; augmentation ([`Augment`]: random crop
//! from a zero-padded image plus horizontal flip) on the u8 pixels; and [`BatchIter`], which
//! yields normalised float batches on the model's device.
use super::image_file::Substitutes;
use super::{Dataset, Normalize};
use tch::{Device, Kind, Tensor};

/// SplitMix64: tiny, fast and fully specified, so orders are reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The generator for one purpose (`stream`) in one epoch of a run seeded with `seed`.
    pub fn for_epoch(seed: u64, epoch: usize, stream: u64) -> Rng {
        let mut r = Rng(seed ^ 0x5851_f42d_4c95_7f2d);
        let a = r.next_u64();
        let mut r = Rng(a ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let b = r.next_u64();
        Rng(b ^ stream.wrapping_mul(0xbf58_476d_1ce4_e5b9))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Training augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Zero padding on each side before a random crop back to the original size (0: no crop).
    pub pad: usize,
    /// Flip horizontally with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// Augments a u8 batch [N, C, H, W] (CPU); the result has the same shape.
    pub fn apply(&self, x: &Tensor, rng: &mut Rng) -> Tensor {
        let s = x.size();
        let (n, c, h, w) = (s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize);
        let src = Vec::<u8>::try_from(&x.contiguous().view([-1])).expect("u8 batch");
        let mut out = vec![0u8; src.len()];
        let p = self.pad as i64;
        for i in 0..n {
            let dy = if p > 0 {
                rng.below(2 * p as u64 + 1) as i64 - p
            } else {
                0
            };
            let dx = if p > 0 {
                rng.below(2 * p as u64 + 1) as i64 - p
            } else {
                0
            };
            let flip = self.flip && rng.next_u64() & 1 == 1;
            for ch in 0..c {
                let base = (i * c + ch) * h * w;
                for y in 0..h {
                    let sy = y as i64 + dy;
                    if sy < 0 || sy >= h as i64 {
                        continue;
                    }
                    for xo in 0..w {
                        let xi = if flip { w - 1 - xo } else { xo };
                        let sx = xi as i64 + dx;
                        if sx < 0 || sx >= w as i64 {
                            continue;
                        }
                        out[base + y * w + xo] = src[base + sy as usize * w + sx as usize];
                    }
                }
            }
        }
        Tensor::from_slice(&out).view([s[0], s[1], s[2], s[3]])
    }
}

/// Iterates over a data set in batches of normalised float images and i64 labels.
pub struct BatchIter<'a> {
    data: &'a Dataset,
    order: Vec<i64>,
    batch_size: usize,
    pos: usize,
    augment: Option<(Augment, Rng)>,
    /// Segmentation training: the generator of the per-image transform seeds.
    seg_rng: Option<Rng>,
    /// (rank, world) of a sharded iterator: per-image seeds are drawn `world` at a time and
    /// the `rank`-th kept, which is the seed of the image's position in the whole epoch.
    draw: (usize, usize),
    normalize: Normalize,
    device: Device,
}

/// The seed of the next image of this rank: the one of its position in the unsharded order.
fn draw_seed(rng: &mut Rng, (rank, world): (usize, usize)) -> u64 {
    let mut kept = 0;
    for i in 0..world.max(1) {
        let v = rng.next_u64();
        if i == rank {
            kept = v;
        }
    }
    kept
}

/// Stream ids for [`Rng::for_epoch`].
const SHUFFLE_STREAM: u64 = 1;
const AUGMENT_STREAM: u64 = 2;

impl<'a> BatchIter<'a> {
    /// Training order for `epoch`: shuffled with (seed, epoch), augmented when asked; the last
    /// partial batch is kept.
    pub fn train(
        data: &'a Dataset,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        augment: Option<Augment>,
        normalize: Normalize,
        device: Device,
    ) -> BatchIter<'a> {
        let mut order: Vec<i64> = (0..data.len() as i64).collect();
        Rng::for_epoch(seed, epoch, SHUFFLE_STREAM).shuffle(&mut order);
        BatchIter {
            data,
            order,
            batch_size: batch_size.max(1),
            pos: 0,
            augment: augment.map(|a| (a, Rng::for_epoch(seed, epoch, AUGMENT_STREAM))),
            seg_rng: data
                .seg
                .as_ref()
                .map(|_| Rng::for_epoch(seed, epoch, AUGMENT_STREAM)),
            draw: (0, 1),
            normalize,
            device,
        }
    }

    /// Rank `rank`'s part of the epoch in a data-parallel run of `world` ranks
    /// ([`crate::dist::shard`]: DistributedSampler's split). Batches keep the size given at
    /// construction (the per-rank size). Class-folder and segmentation sets draw each image's
    /// transform from its position in the whole epoch, so the ranks' batches together are the
    /// single-process batches of `world` times the size; the in-memory augmentation, which
    /// draws a varying count per image, takes a stream of its own per rank instead.
    pub fn shard(mut self, seed: u64, epoch: usize, rank: usize, world: usize) -> BatchIter<'a> {
        if world <= 1 {
            return self;
        }
        self.order = crate::dist::shard(&self.order, rank, world);
        self.draw = (rank, world);
        if self.data.folder.is_none() {
            if let Some((_, rng)) = &mut self.augment {
                *rng = Rng::for_epoch(seed, epoch, AUGMENT_STREAM + ((rank as u64 + 1) << 32));
            }
        }
        self
    }

    /// Evaluation order: in order, no augmentation.
    pub fn eval(
        data: &'a Dataset,
        batch_size: usize,
        normalize: Normalize,
        device: Device,
    ) -> BatchIter<'a> {
        BatchIter {
            data,
            order: (0..data.len() as i64).collect(),
            batch_size: batch_size.max(1),
            pos: 0,
            augment: None,
            seg_rng: None,
            draw: (0, 1),
            normalize,
            device,
        }
    }

    /// Only the images at positions `r` of the order (a rank's share of an evaluation).
    pub fn part(mut self, r: std::ops::Range<usize>) -> BatchIter<'a> {
        self.order = self.order[r].to_vec();
        self
    }

    /// Number of batches in total.
    pub fn batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// The image indices in iteration order.
    pub fn order(&self) -> &[i64] {
        &self.order
    }

    /// Skips the next `n` batches without decoding them, drawing the same random numbers as
    /// yielding them would (so a run resumed mid-epoch sees the batches an uninterrupted run
    /// sees). Only segmentation and class-folder sets draw per image; the in-memory
    /// augmentation draws per image too (offsets and flip), so it is replayed on a dummy batch.
    pub fn skip_batches(&mut self, n: usize) {
        for _ in 0..n {
            if self.pos >= self.order.len() {
                return;
            }
            let end = (self.pos + self.batch_size).min(self.order.len());
            let count = end - self.pos;
            if let Some(rng) = &mut self.seg_rng {
                for _ in 0..count {
                    draw_seed(rng, self.draw);
                }
            } else if let Some((a, rng)) = &mut self.augment {
                if self.data.folder.is_some() {
                    for _ in 0..count {
                        draw_seed(rng, self.draw);
                    }
                } else {
                    let _ = a.apply(
                        &Tensor::zeros([count as i64, 1, 1, 1], (Kind::Uint8, Device::Cpu)),
                        rng,
                    );
                }
            }
            self.pos = end;
        }
    }
}

impl<'a> BatchIter<'a> {
    /// The next batch's images and how to transform them, drawing its random numbers now (so
    /// decoding may happen later, elsewhere, in any order). In-memory sets are augmented here.
    pub(super) fn next_job(&mut self) -> Option<crate::error::Result<Job>> {
        if self.pos >= self.order.len() {
            return None;
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let ids = self.order[self.pos..end].to_vec();
        let at = self.pos;
        self.pos = end;
        if self.data.seg.is_some() {
            let t = match &mut self.seg_rng {
                Some(rng) => ids
                    .iter()
                    .map(|_| super::seg::Transform::Train(draw_seed(rng, self.draw)))
                    .collect(),
                None => vec![super::seg::Transform::Fixed; ids.len()],
            };
            return Some(Ok(Job::Seg { ids, t, at }));
        }
        if self.data.folder.is_some() {
            // Class folders are augmented while decoding (random-resized-crop + flip), one seed
            // per image drawn in order so the batch is reproducible.
            let t = match &mut self.augment {
                Some((_, rng)) => ids
                    .iter()
                    .map(|_| super::folder::Transform::Train(draw_seed(rng, self.draw)))
                    .collect(),
                None => vec![super::folder::Transform::Eval; ids.len()],
            };
            return Some(Ok(Job::Folder { ids, t, at }));
        }
        let x = self.data.select(&ids).map(|x| match &mut self.augment {
            Some((a, rng)) => a.apply(&x, rng),
            None => x,
        });
        let y = self.data.labels.index_select(0, &Tensor::from_slice(&ids));
        Some(x.map(|x| Job::Ready { x, y }))
    }

    pub(super) fn device(&self) -> Device {
        self.device
    }

    pub(super) fn normalize(&self) -> &Normalize {
        &self.normalize
    }

    pub(super) fn data(&self) -> &'a Dataset {
        self.data
    }
}

/// One batch to produce: file-backed sets name their images and transforms (decoded by
/// [`Job::decode`], on any thread); in-memory sets are ready.
pub(super) enum Job {
    Seg {
        ids: Vec<i64>,
        t: Vec<super::seg::Transform>,
        /// Position of the first image in the iterator's order.
        at: usize,
    },
    Folder {
        ids: Vec<i64>,
        t: Vec<super::folder::Transform>,
        at: usize,
    },
    Ready {
        x: Tensor,
        y: Tensor,
    },
}

impl Job {
    /// (u8 images [B, C, H, W], i64 labels [B] or masks [B, H, W]) on the CPU. With
    /// `subs` (the order the jobs came from, and the count to add to), an image that cannot be
    /// decoded is replaced ([`super::BadImages::Substitute`]).
    pub(super) fn decode(
        self,
        folder: Option<&super::folder::FolderSet>,
        seg: Option<&super::seg::SegSet>,
        subs: Option<&Substitutes>,
    ) -> crate::error::Result<(Tensor, Tensor)> {
        match self {
            Job::Seg { ids, t, at } => {
                let s = seg.expect("a segmentation set");
                s.decode_batch_subs(&ids, &t, subs.map(|s| (s, at)))
            }
            Job::Folder { ids, t, at } => {
                let f = folder.expect("a class-folder set");
                let (b, y) = f.decode_labelled(&ids, &t, subs.map(|s| (s, at)))?;
                let s = f.side as i64;
                Ok((
                    Tensor::from_slice(&b).view([ids.len() as i64, 3, s, s]),
                    Tensor::from_slice(&y),
                ))
            }
            Job::Ready { x, y } => Ok((x, y.to_kind(Kind::Int64))),
        }
    }
}

impl Iterator for BatchIter<'_> {
    /// (images float32 [B, C, H, W] normalised, labels i64 [B] or masks i64 [B, H, W] for
    /// segmentation), on the device; an error when an image of a class-folder or segmentation
    /// set cannot be decoded.
    type Item = crate::error::Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        let job = match self.next_job()? {
            Ok(j) => j,
            Err(e) => return Some(Err(e)),
        };
        let data = self.data;
        Some(
            job.decode(data.folder.as_deref(), data.seg.as_deref(), None)
                .map(|(x, y)| {
                    (
                        self.normalize.apply(&x.to_device(self.device)),
                        y.to_device(self.device),
                    )
                }),
        )
    }
}
