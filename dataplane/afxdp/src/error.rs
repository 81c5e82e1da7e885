use std::fmt;

/// The underlying cause of an [`Error`].
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from this crate: what was being done, and the underlying cause.
#[derive(Debug)]
pub struct Error {
    context: String,
    source: Option<Source>,
}

impl Error {
    /// An error with no underlying cause.
    pub fn msg(context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by `source`.
    pub fn with(context: impl Into<String>, source: impl Into<Source>) -> Self {
        Self {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// The raw OS error behind this one, if any (e.g. `EOPNOTSUPP` from a zero-copy bind).
    pub fn raw_os_error(&self) -> Option<i32> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> =
            self.source.as_deref().map(|s| s as _);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return io.raw_os_error();
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => {
                write!(f, "{}: {s}", self.context)?;
                let mut cur = s.source();
                while let Some(e) = cur {
                    write!(f, ": {e}")?;
                    cur = e.source();
                }
                Ok(())
            }
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
