//! The protobuf codec of ult's services: prost's, except that a message that does not decode (a string
//! field that is not UTF-8, a truncated or mistyped field) is INVALID_ARGUMENT, the sender's fault, rather
//! than prost's INTERNAL, which would read as a bug in ultd.

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors mapped to INVALID_ARGUMENT.
#[derive(Debug, Clone, Default)]
pub struct UltCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for UltCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = UltDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        UltDecoder(self.0.decoder())
    }
}

/// Decodes like prost; a message that does not decode is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct UltDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for UltDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == Code::Internal {
                Status::invalid_argument(format!(
                    "the message does not decode as ult.v1 protobuf: {}",
                    s.message()
                ))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
