//! A loader that keeps the device fed: the batches of a [`BatchIter`] over a class-folder or
//! segmentation set are decoded and augmented on a pool of worker threads, ahead of the
//! training step, into a bounded queue of ready batches (pinned host memory for a CUDA device,
//! copied asynchronously). Up to `prefetch` batches are decoded at once, their images spread
//! over all workers in any order and each batch handed on in order once whole, so small
//! batches (16 images on a rank) still keep every worker busy. The random numbers of every
//! batch are drawn in order on the calling thread before any decoding, and each image is
//! decoded from its own seed, so the batches are the same whatever the number of workers.
//! In-memory sets (MNIST, CIFAR) need no decoding and are iterated in place.
use super::batch::{BatchIter, Job};
use super::image_file::Substitutes;
use super::Normalize;
use crate::error::{Error, Result};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::{Device, Tensor};

/// How many threads decode and how many ready batches may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Decoding threads (0: [`default_workers`]).
    pub workers: usize,
    /// Batches decoded at once, and ready batches kept ahead of the training step (at least 1).
    pub prefetch: usize,
    /// Images that cannot be decoded: an error, or substituted and counted in
    /// [`super::Dataset::substituted`].
    pub bad_images: super::BadImages,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            workers: 0,
            prefetch: 2,
            bad_images: super::BadImages::Error,
        }
    }
}

type Batch = Result<(Tensor, Tensor)>;

/// Decoding threads when none are asked for: the cores (as rayon counts them) shared by the
/// ranks on this node (LOCAL_WORLD_SIZE, set by torchrun; Slurm: SLURM_NTASKS_PER_NODE).
pub fn default_workers() -> usize {
    let local = ["LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    (rayon::current_num_threads() / local).max(1)
}

/// The batches of a [`BatchIter`], produced ahead by a background thread (see the module).
pub enum Prefetched<'a> {
    /// In-memory sets.
    Inline(BatchIter<'a>),
    Background {
        rx: Option<Receiver<Batch>>,
        thread: Option<JoinHandle<()>>,
        device: Device,
        /// Normalisation still to apply on the device (CUDA: u8 crosses the bus, not f32).
        normalize: Option<Normalize>,
    },
}

impl<'a> BatchIter<'a> {
    /// These batches from a pool of `o.workers` decoding threads, `o.prefetch` ahead.
    pub fn prefetch(mut self, o: LoaderOptions) -> Result<Prefetched<'a>> {
        let data = self.data();
        let (folder, seg) = (data.folder.clone(), data.seg.clone());
        if folder.is_none() && seg.is_none() {
            return Ok(Prefetched::Inline(self));
        }
        let device = self.device();
        let norm = self.normalize().clone();
        let subs = (o.bad_images == super::BadImages::Substitute).then(|| Substitutes {
            order: Arc::new(self.order().to_vec()),
            count: data.substituted.clone(),
        });
        let jobs: Vec<Job> = std::iter::from_fn(|| self.next_job()).collect::<Result<_>>()?;
        let workers = match o.workers {
            0 => default_workers(),
            n => n,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers)
            .thread_name(|i| format!("brelu-loader-{i}"))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("cannot start the loader threads: {e}")))?;
        let window = o.prefetch.max(1);
        let (tx, rx) = sync_channel::<Batch>(window);
        let on_cpu = device == Device::Cpu;
        let cpu_norm = on_cpu.then(|| norm.clone());
        let thread = std::thread::Builder::new()
            .name("brelu-loader".into())
            .spawn(move || {
                let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, Batch)>();
                let mut jobs = jobs.into_iter().enumerate();
                // Batches decoding or decoded but not yet handed on, by position.
                let mut ready = std::collections::BTreeMap::new();
                let (mut next, mut started) = (0, 0);
                loop {
                    while started < next + window {
                        let Some((i, job)) = jobs.next() else { break };
                        let (folder, seg, subs) = (folder.clone(), seg.clone(), subs.clone());
                        let (cpu_norm, done_tx) = (cpu_norm.clone(), done_tx.clone());
                        // Decoding and the CPU's normalisation both run on the pool's threads.
                        pool.spawn(move || {
                            let b = job.decode(folder.as_deref(), seg.as_deref(), subs.as_ref());
                            let b = b.map(|(x, y)| match &cpu_norm {
                                Some(n) => (n.apply(&x), y),
                                None => (x.pin_memory(device), y.pin_memory(device)),
                            });
                            // The loader stopped early: nobody waits for this batch.
                            let _ = done_tx.send((i, b));
                        });
                        started += 1;
                    }
                    if next == started {
                        return;
                    }
                    let Ok((i, b)) = done_rx.recv() else { return };
                    ready.insert(i, b);
                    while let Some(b) = ready.remove(&next) {
                        // The receiver is gone when the consumer stopped early: stop too.
                        if tx.send(b).is_err() {
                            return;
                        }
                        next += 1;
                    }
                }
            })
            .map_err(|e| Error::InvalidArgument(format!("cannot start the loader thread: {e}")))?;
        Ok(Prefetched::Background {
            rx: Some(rx),
            thread: Some(thread),
            device,
            normalize: (!on_cpu).then_some(norm),
        })
    }
}

impl Iterator for Prefetched<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        match self {
            Prefetched::Inline(it) => it.next(),
            Prefetched::Background {
                rx,
                device,
                normalize,
                ..
            } => {
                let b = rx.as_ref()?.recv().ok()?;
                Some(b.map(|(x, y)| {
                    let x = x.to_device_(*device, x.kind(), true, false);
                    let y = y.to_device_(*device, y.kind(), true, false);
                    match normalize {
                        Some(n) => (n.apply(&x), y),
                        None => (x, y),
                    }
                }))
            }
        }
    }
}

impl Drop for Prefetched<'_> {
    fn drop(&mut self) {
        if let Prefetched::Background { rx, thread, .. } = self {
            // Closing the queue first ends a producer blocked on a full queue.
            drop(rx.take());
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}
