//! One client's view of a flight: it reads bytes [from, to) as the fill publishes them, from the fill's
//! mapping, the in-memory window of the newest bytes, or the fill file, and never what the fill has not
//! written (nor the object's last byte before the body is complete: `Progress::readable`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::{End, FetchError, Flight};

/// Largest slice a reader takes at once from a mapped fill.
const MAP_CHUNK: u64 = 1 << 20;
/// Largest chunk a reader takes at once from the file.
const READ_CHUNK: usize = 256 << 10;

pub struct FlightReader {
    pub(super) flight: Arc<Flight>,
    /// Its entry in the flight's reader positions (for pass-through back-pressure).
    pub(super) id: u64,
    pos: u64,
    to: Option<u64>,
    /// The generation it reads; a diverging restart cuts it off.
    generation: u32,
}

enum Step {
    Data(Bytes),
    FromFile(Arc<File>, u64, usize),
    Done,
    Wait,
}

impl FlightReader {
    pub(super) fn new(
        flight: Arc<Flight>,
        id: u64,
        from: u64,
        to: Option<u64>,
        generation: u32,
    ) -> FlightReader {
        FlightReader {
            flight,
            id,
            pos: from,
            to,
            generation,
        }
    }

    /// Positions the reader on bytes [from, to) (`to` None = to the end of the object).
    pub fn seek(&mut self, from: u64, to: Option<u64>) {
        self.pos = from;
        self.to = to;
        self.flight.moved(self.id, from);
    }

    /// The next bytes, None at the end of the requested range, or the error that ended the flight (the
    /// client's connection must then be aborted, never finished).
    pub async fn next(&mut self) -> Option<Result<Bytes, FetchError>> {
        let mut rx = self.flight.progress.subscribe();
        loop {
            let step = match self.step() {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            match step {
                Step::Data(b) => return Some(Ok(self.advance(b))),
                Step::Done => return None,
                Step::FromFile(file, at, len) => return Some(self.read_file(file, at, len).await),
                Step::Wait => {
                    if rx.changed().await.is_err() {
                        return Some(Err(FetchError::Internal("transfer vanished".into())));
                    }
                }
            }
        }
    }

    async fn read_file(
        &mut self,
        file: Arc<File>,
        at: u64,
        len: usize,
    ) -> Result<Bytes, FetchError> {
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            let n = file.read_at(&mut buf, at)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>(buf)
        })
        .await;
        match read {
            Ok(Ok(buf)) if !buf.is_empty() => {
                // The bytes may have been replaced meanwhile by a diverging restart.
                if self.flight.progress.borrow().generation != self.generation {
                    return Err(FetchError::Diverged);
                }
                Ok(self.advance(Bytes::from(buf)))
            }
            Ok(Ok(_)) => Err(FetchError::Internal(
                "fill file shorter than written".into(),
            )),
            Ok(Err(e)) => Err(FetchError::Internal(format!("reading fill: {e}"))),
            Err(e) => Err(FetchError::Internal(e.to_string())),
        }
    }

    fn advance(&mut self, b: Bytes) -> Bytes {
        self.pos += b.len() as u64;
        self.flight.moved(self.id, self.pos);
        b
    }

    fn step(&self) -> Result<Step, FetchError> {
        let st = self.flight.state();
        let p = self.flight.progress.borrow();
        if p.generation != self.generation {
            return Err(FetchError::Diverged);
        }
        let end = p.range_end(self.to);
        if self.pos >= end {
            return Ok(Step::Done);
        }
        let readable = p.readable(end);
        if self.pos < readable {
            if let Some(map) = &st.map {
                let upto = readable
                    .min(self.pos + MAP_CHUNK)
                    .min(map.len() as u64)
                    .min(st.file_valid);
                if self.pos < upto {
                    return Ok(Step::Data(map.slice(self.pos as usize..upto as usize)));
                }
            }
            if let Some(b) = st.window_slice(self.pos, readable) {
                return Ok(Step::Data(b));
            }
            return match &st.file {
                Some(f) if self.pos < st.file_valid => {
                    let limit = readable
                        .min(st.window_start.max(self.pos + 1))
                        .min(st.file_valid);
                    let len = (limit - self.pos).min(READ_CHUNK as u64) as usize;
                    Ok(Step::FromFile(f.clone(), self.pos, len))
                }
                _ => Err(FetchError::Internal(
                    "reader fell behind a pass-through transfer".into(),
                )),
            };
        }
        if let Some(End::Failed(e)) = &p.end {
            return Err(e.clone());
        }
        if p.read_all(self.pos, end) {
            return Ok(Step::Done);
        }
        Ok(Step::Wait)
    }
}

impl Drop for FlightReader {
    fn drop(&mut self) {
        self.flight.left(self.id);
    }
}
